"""Video decoding: container probing, Qwen frame sampling, DALI and PyAV backends, backend choice."""
