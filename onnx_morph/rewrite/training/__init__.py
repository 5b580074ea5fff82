"""The training side: the regularizer as ONNX nodes (regularizer, training_graph), onnxruntime-training
artifacts, channel gates and batch-flexible exports."""
