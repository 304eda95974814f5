from xmlsparse.cli import main

main()
