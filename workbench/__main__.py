import os
import sys

from workbench.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
    # A torchrun worker (`train` under DistributedDataParallel) leaves without finalizing the interpreter.
    # Its process group has been destroyed, but gloo's worker threads outlive it (the backend object is not
    # freed) and release the last collective's tensors a moment after the collective returns; a release that
    # lands during Py_Finalize needs the GIL, and a thread asking for the GIL then is made to exit inside a
    # noexcept destructor: "terminate called without an active exception", SIGABRT, about one run in forty
    # (gdb: ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> decref_pyobject -> take_gil -> pthread_exit).
    # Everything the command wrote is closed by now; only the buffered streams need flushing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
