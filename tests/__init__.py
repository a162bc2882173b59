"""
The tests press Ctrl-C (SIGINT) on the programs they start, as a terminal
does. A suite started in the background by a shell without job control (a
CI job's ``cmd &``) inherits SIGINT ignored, and so would every child: a
handler here instead is reset to the default in each child it starts.
"""

import signal as _signal

if _signal.getsignal(_signal.SIGINT) == _signal.SIG_IGN:
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)
