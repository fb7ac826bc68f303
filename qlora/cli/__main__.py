"""python -m qlora.cli: the qlora command."""
from qlora.cli import entry

entry()
