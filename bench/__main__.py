from bench.cli import main

if __name__ == "__main__":  # guarded: `sweep --jobs` workers are spawned and re-import this module
    raise SystemExit(main())
