from gradhub_worker.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
