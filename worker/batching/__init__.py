"""The queue side of the worker, as rq sees it: taking jobs (crash-safe pops, defensive reads), registering
them, running their images in engine batches, completing them (outcomes written once, atomically),
maintenance (recovery of dead workers' jobs, the scheduler, cleanups). ``rqfence`` is the one module that holds
rq's internals and writes rq's data structures.
"""
