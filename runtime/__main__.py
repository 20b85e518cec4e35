import sys

# Dask's worker processes start by spawning, which imports this module again as
# __mp_main__: the command runs only in the process that was started with it.
if __name__ == "__main__":
    try:
        from .cli import main

        code = main()
    except KeyboardInterrupt:  # before a command began (importing, compiling) or while one was saving
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
