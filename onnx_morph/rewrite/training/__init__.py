"""The training side: the regularizer as ONNX nodes (regularizer, training_graph), onnxruntime-training
artifacts, channel gates and batch-flexible exports."""

BATCH_SIZE = 64  # a training step's batch, fixed in the artifacts; calibration batches are as large
CALIBRATION_BATCHES = 20  # BatchNorm statistics of a pruned model are re-measured on this many batches
