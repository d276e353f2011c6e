"""Run a stage module as `python -m` would, then report the bytes it read (`rchar` of /proc/self/io)."""

import json
import runpy
import sys


def read_bytes() -> int:
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))


def main() -> None:
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    try:
        runpy.run_module(module, run_name="__main__")
    except SystemExit as e:  # the stages end with sys.exit
        if e.code:
            raise
    print(json.dumps({"read_gb": round(read_bytes() / 1024**3, 3)}))


if __name__ == "__main__":
    main()
