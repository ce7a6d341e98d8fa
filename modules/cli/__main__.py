import os
import sys

from modules.cli.main import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # One of several processes (accelerate launch, torchrun): its work is done, its files are
    # written and closed. Leave without the interpreter's teardown, where the threads torch's
    # process group and thread pools leave behind can abort a process that finished well
    # ("terminate called without an active exception"), which the launcher reports as a
    # failure of the whole run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
sys.exit(code)
