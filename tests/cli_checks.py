"""Assertions shared by the CLI tests."""


def assert_user_error(proc, *fragments: str) -> str:
    """Exit 2, nothing on stdout, exactly one stderr line `onnx-morph: error: ...`, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("onnx-morph: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
