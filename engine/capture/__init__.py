"""The capture process (process.py: PyAudio or WAV mic -> echo handling -> mic ring) and its
WebRTC echo canceller (echo.py)."""
