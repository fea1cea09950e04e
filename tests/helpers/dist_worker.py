"""One rank of a test job (tests/helpers/dist.py): ``dist_worker.py '[[cli args], ...]'`` runs each
``fastmerge`` command line in turn; prints ``RC <code>`` per command; exits with the largest code."""

import json
import os
import sys

if __name__ == "__main__":
    jobs = json.loads(sys.argv[1])
    if os.environ.get("FASTMERGE_TEST_INIT_GROUP") == "1":
        import datetime

        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    from fastmerge import _native
    from fastmerge.cli import main

    if not _native.HAS_CPU_EXT and os.environ.get("FASTMERGE_ALLOW_MISSING") != "1":
        # a rank without the native extension would still write the right bytes (on torch) and hide it
        print(f"dist_worker: fastmerge._C is not loaded ({_native.LOAD_ERRORS.get('_C')})", file=sys.stderr)
        sys.exit(3)

    worst = 0
    for args in jobs:
        rc = main(args)
        print(f"RC {rc}", flush=True)
        worst = max(worst, rc)
    if os.environ.get("FASTMERGE_TEST_INIT_GROUP") == "1":
        # the group this worker made, destroyed by it: a gloo group alive at interpreter exit can abort
        # the process ("terminate called without an active exception") after its work is done
        dist.destroy_process_group()
    sys.exit(worst)
