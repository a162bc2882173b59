from twisted.application.service import ServiceMaker

trainstream = ServiceMaker(
    "trainstream",
    "trainstream.tap",
    "Stream ML training runs live (SSE, WebSocket, REST, dashboard).",
    "trainstream",
)
