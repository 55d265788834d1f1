"""``python -m lylm``: the ``lylm`` command (see :mod:`lylm.cli`)."""

from lylm.cli import main

if __name__ == "__main__":  # vLLM spawns engine processes, which import this module again
    main()
