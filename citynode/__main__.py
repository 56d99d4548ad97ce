"""``python -m citynode`` is the ``citynode`` command."""

from citynode.cli import main

if __name__ == "__main__":
    main()
