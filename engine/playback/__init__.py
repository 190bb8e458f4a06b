"""The playback process (process.py: speaker ring -> prebuffer, fades, flush -> PyAudio or WAV)
and its time-stretcher (stretch.py)."""
