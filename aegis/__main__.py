"""`python -m aegis` runs the command-line interface."""
from aegis.cli import main

if __name__ == "__main__":
    main()
