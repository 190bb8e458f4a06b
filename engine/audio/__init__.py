"""Audio plumbing shared by the processes: the shared-memory SPSC ring (ring.py), PyAudio devices
(devices.py), WAV writers (record.py)."""
