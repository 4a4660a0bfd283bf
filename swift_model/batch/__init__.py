"""Many videos with the models loaded once: the job file (:mod:`.jobs`), the outputs and the results log
(:mod:`.results`), and the loop that runs jobs on a loaded pipeline (:mod:`.runner`).

A layer-5 sibling of ``planning`` and ``training``: it imports ``io``, ``nets``, ``loading`` and ``generation``;
``swift-i2v batch`` (the ``cli``) drives it.
"""
