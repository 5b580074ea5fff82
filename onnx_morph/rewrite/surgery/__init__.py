"""Surgery on the inference model: choose channels (select, latency), remove or add them (surgery, expand),
check the result against the original (verify), re-measure BatchNorm (calibrate) and write it (save)."""
