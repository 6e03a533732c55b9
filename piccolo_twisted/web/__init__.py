"""The instrument's own web page: live spectra and control in a browser.

A face of the same components the CoAP site serves (``web`` and ``coap``
never import each other): the page reads and changes them through
``/api/<path>`` with the answers CoAP gives, follows their Observables
through a Server-Sent Events stream, and downloads files and runs through
a worker pool. Imported only when the web page is on (``[web] port``).
"""


def web_service(components, datadir_root, address="::", port=8080, access=None,
                clock=None, title="Piccolo", hosts=()):
    """The web page as a service (binds in privilegedStartService);
    ``hosts``: names it answers to besides its own (``[web] hosts``)."""
    from .server import WebService
    return WebService(components, datadir_root, address=address, port=port,
                      access=access, clock=clock, title=title, hosts=hosts)
