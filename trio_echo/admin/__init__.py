"""The admin port: HTTP (dashboard, health, metrics) and the WebSocket admin channel on one port.

Pure: :mod:`.protocol` (channel messages), :mod:`.routing` (which handler, which status),
:mod:`.metrics` (Prometheus text). I/O: :mod:`.http` (request heads with h11), :mod:`.channel` (one
WebSocket session), :mod:`.port` (the listener and its connection cap), :mod:`.token` (the token file).
"""
