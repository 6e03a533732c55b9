"""``piccolo3``: the operator's command line (extra ``[cli]``).

It speaks the CoAP API like any other client (aiocoap); the server never
imports it and it imports nothing of the server.
"""
