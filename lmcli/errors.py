class UserError(Exception):
    """Something the user can fix: a wrong path, a bad option, an unsupported model.

    Commands print its message as one line on stderr and exit non-zero, without a traceback.
    """
