//! `valet`: parses arguments, runs one command, maps the outcome to an exit code
//! (0 ok, 1 failure, 2 usage, 3 denied, 4 unreachable).

mod commands;

use clap::Parser;

fn main() {
    let arguments = commands::Arguments::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("valet: cannot start the async runtime: {error}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(commands::run(arguments)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("valet: {error:#}");
            commands::exit_code_of(&error)
        }
    };
    std::process::exit(code);
}
