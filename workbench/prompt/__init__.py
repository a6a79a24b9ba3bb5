"""One prompt, looked at closely: `workbench run prompt` and what it computes.

`views` computes one prompt's views at one checkpoint (attention, logit lens, direct logit
attribution, attention rollout and flow, information-flow routes) and their rows. Why this
token: `inputattr` attributes the prediction's logit to the input tokens by every method, with
faithfulness curves and the methods' agreement (Captum's gradient and perturbation methods;
`lrp`: AttnLRP and gradient-weighted relevance rollout; `decomposition`: ALTI and GlobEnc);
`patchscope` decodes each layer's hidden state; `tunedlens` trains and applies a tuned lens, and
`lensrun` is `workbench run tuned-lens`. `run` is the command, which computes them at each chosen
checkpoint and stores them (tables `prompt_*`).

The command is not a registered pipeline (`workbench.registry`): a prompt is not a task, and
its views are keyed by `prompt_id` (checkpoint, token ids, tau), not by a run key, so they make
no `runs` row and `workbench run all`, `demo` and `watch` do not run it. The app's Prompt page
starts it in a process of its own.
"""
