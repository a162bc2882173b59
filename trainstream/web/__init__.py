"""
The resource tree every listener serves: REST, SSE, WebSocket and the dashboard.
"""
