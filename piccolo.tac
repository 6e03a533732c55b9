# twistd -y piccolo.tac: the same service as `twistd piccolo`.
# The server config comes from $PICCOLO_CONFIG when set (else the embedded
# default); $PICCOLO_DATA_DIR overrides its data directory.
import os

from twisted.application import service

from piccolo_twisted.tap import Options, makeService

args = []
if os.environ.get("PICCOLO_CONFIG"):
    args += ["--config", os.environ["PICCOLO_CONFIG"]]
if os.environ.get("PICCOLO_DATA_DIR"):
    args += ["--data-dir", os.environ["PICCOLO_DATA_DIR"]]
options = Options()
options.parseOptions(args)

application = service.Application("piccolo")
makeService(options).setServiceParent(application)
