class UserError(Exception):
    """Something the user can fix: a wrong path, a bad option, an unsupported model.

    Commands print its message as one line on stderr and exit non-zero, without a traceback; the HTTP server
    answers 400 with param (the request field at fault, where there is one).
    """

    def __init__(self, message: str, param=None):
        super().__init__(message)
        self.param = param
