import sys

from rrhf_ray.cli import main

if __name__ == "__main__":  # vLLM spawns workers: the guard keeps them from re-running the CLI
    sys.exit(main())
