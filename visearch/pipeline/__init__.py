"""The pipeline steps, one module each (verbs as in hloc): convert, extract (plan, run, commit; engines), search
(Searcher, typed results), evaluate (the revisitop protocol), detect. visearch.api re-exports the public functions."""
