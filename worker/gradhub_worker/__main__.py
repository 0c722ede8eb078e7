from gradhub.processes import exit_now
from gradhub_worker.cli import main

if __name__ == "__main__":
    exit_now(main())
