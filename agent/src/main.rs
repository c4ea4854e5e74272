fn main() -> anyhow::Result<()> {
    nattrail::cli::main()
}
