"""``python -m cloudfree`` is the ``cloudfree`` command."""

from cloudfree.pipeline.cli import main

if __name__ == "__main__":
    main()
