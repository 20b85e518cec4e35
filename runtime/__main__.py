import sys

try:
    from .cli import main

    code = main()
except KeyboardInterrupt:  # before a command began (importing, compiling) or while one was saving
    print("interrupted", file=sys.stderr)
    code = 130
sys.exit(code)
