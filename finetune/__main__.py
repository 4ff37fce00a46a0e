"""`python -m finetune`: the `finetune` command."""

import sys

from finetune.commands.finetune import main

if __name__ == "__main__":
    sys.exit(main())
