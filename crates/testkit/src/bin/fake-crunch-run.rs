//! `fake-crunch-run`: see `testkit::fake_crunch_run`.

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let code = testkit::fake_crunch_run::main_with_args(&argv).await;
    std::process::exit(code);
}
