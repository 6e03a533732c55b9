"""The UDP service that serves a Site over CoAP."""

from twisted.application import internet

from .protocol import ServerCoap
from .site import Site


def coap_service(components, address="::", port=5683, clock=None, access=None):
    """A ``UDPServer`` (binds in privilegedStartService) for the components.

    ``access`` (an ``access.ControlPolicy``, or None for everyone) is asked
    ``refusal(host)`` for every request that may change anything; a
    refusal is answered 4.03 Forbidden with its reason.

    ``maxPacketSize`` is the largest UDP datagram: Twisted's default of 8192
    cut larger PUTs short (#13); bodies over the Block1 limit get 4.13.

    ``access``: an optional policy object with ``refusal(host) ->
    Optional[str]`` (None: allowed, else the reason). Requests that change
    anything (PUT, POST, DELETE, and a GET of a resource whose GET acts)
    from a refused host are answered 4.03 with the reason as plain text;
    reads stay open.
    """
    protocol = ServerCoap(Site(components), clock=clock, access=access)
    service = internet.UDPServer(port, protocol, interface=address,
                                 maxPacketSize=65535)
    service.protocol = protocol
    return service
