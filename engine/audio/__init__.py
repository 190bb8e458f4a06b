"""Audio plumbing shared by the processes: the shared-memory SPSC ring (ring.py), PyAudio devices
(devices.py), WAV writers (record.py), the level meters (levels.py), the console's listen and talk
as capture and playback see them (listen_talk.py), the mic and speaker checks (preflight.py)."""
