"""Video decoding: container probing, Qwen frame sampling, DALI and PyAV backends, backend choice, and the
YUV -> RGB step both backends share (``colour``)."""
