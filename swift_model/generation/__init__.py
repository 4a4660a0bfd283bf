"""Layer 4, one generation: the request, Stage I conditioning (``stage1``), the hybrid reference (``bridge``), CSG
(``csg``), the memory plan (``memory``), several processes (``distributed``) and the pipeline (``pipeline``)."""
