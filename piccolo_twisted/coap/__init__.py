"""The CoAP layer: the only package that imports txThings.

Importing it applies the module-level fixes txThings 0.3.0 needs on
Python 3 (see DESIGN.md, table of confirmed problems):

- #6  blockwise transfers use 1024-byte blocks, not 64;
- #8  a Block option's length matches its encoding (``(0, False, 0)``
      encodes to zero bytes, txThings announced one);
- #11 Accept (17) is a uint option, not opaque bytes;
- #16 txThings' per-datagram ``log.msg`` chatter goes to debug level.
"""

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", SyntaxWarning)  # #17: Python 2-era code
    from txthings import coap as _tx
    from txthings import resource as _txresource

from twisted.logger import Logger

_tx.DEFAULT_BLOCK_SIZE_EXP = 6
_tx.option_formats[_tx.ACCEPT] = _tx.UintOption
_tx.option_formats[_tx.SIZE1] = _tx.UintOption


def _block_length(self):
    return len(self.encode())


_tx.BlockOption.length = property(_block_length)


class _QuietLog:
    """Stands in for ``twisted.python.log`` inside txThings: debug level only."""

    _log = Logger(namespace="txthings")

    def msg(self, *message, **kw):
        self._log.debug("{text}", text=" ".join(str(m) for m in message))

    def err(self, *a, **kw):
        self._log.debug("txthings error {a!r}", a=a)


_tx.log = _QuietLog()
_txresource.log = _tx.log
