// The ops' qualified names from the namespace token, for C++ code that calls an op through the
// dispatcher: a build whose namespace is renamed (-Dmolrg=molrg_ref, the paired timing's
// reference build in benchmarks/paired/op_run.sh) then calls its own kernels. As string
// literals, which the macro does not reach, the renamed build's autograd kernel called the other
// build's forward.
#pragma once

#define MOLRG_OP_STR2(ns) #ns
#define MOLRG_OP_STR(ns) MOLRG_OP_STR2(ns)
#define MOLRG_OP_NAME(op) MOLRG_OP_STR(molrg) "::" op
