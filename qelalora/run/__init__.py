"""One training job, by the flow: the recipe -> data -> plan -> train -> the run folder it writes."""
