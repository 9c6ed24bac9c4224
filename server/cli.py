import sys


def main() -> int:
    print("lookm-serve: not implemented yet (see issue 5)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
