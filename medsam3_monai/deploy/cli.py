"""The `medsam3` command line."""
import sys


def main(argv=None) -> int:
    print("medsam3: under construction")
    return 0


if __name__ == "__main__":
    sys.exit(main())
