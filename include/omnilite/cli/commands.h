// Subcommands of the `omnilite` program. Each takes the arguments after its name (argv[0] = "omnilite NAME")
// and returns the process exit code.
#pragma once

namespace omnilite::cli {

int run_info(int argc, char** argv);
int run_bench(int argc, char** argv);
int run_tokenizer(int argc, char** argv);
int run_train(int argc, char** argv);
int run_eval(int argc, char** argv);

}  // namespace omnilite::cli
