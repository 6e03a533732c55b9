from twisted.application.service import ServiceMaker

piccolo = ServiceMaker(
    "piccolo",
    "piccolo_twisted.tap",
    "Piccolo field spectrometer server (CoAP)",
    "piccolo",
)
