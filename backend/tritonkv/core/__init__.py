"""The engine core: one process per (device, pool name) that owns the Engine (scheduler, KV
cache, model runner, sampler) and serves every frontend (Triton instance) that names the
pool. ``proc.py`` is the process, ``client.py`` the frontend's side, ``messages.py`` what
travels between them, ``runtime_dir.py`` where the socket lives, ``spawn.py`` who starts it.
"""
