"""Running a trained model: PyTorch generation (the ONNX path lives in fed_llama.export)."""
