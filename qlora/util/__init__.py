"""Small shared helpers with no model knowledge; none imports torch at import time (`qlora --help` uses them).

    dtypes.py   the float dtypes by name              sizes.py    memory sizes ("24GiB"), from memprofile.units
    checks.py   field checks of the typed configs     configs.py  typed configs from YAML + key=value overrides
    staging.py  temp-then-rename writes               dist.py     which process this is (the one rank rule)
    quiet.py    log lines users cannot act on, dropped at their source loggers
"""
