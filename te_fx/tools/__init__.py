"""The command-line tools: ``te-fx demo``, ``check``, ``explain`` and ``bench``, and the tiny models they build."""
